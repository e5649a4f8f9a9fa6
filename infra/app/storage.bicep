// One storage account created by lakeguard's deployment: the jobs account (host storage, queues,
// deployment package) or the backup account. Keyless by construction: shared-key access is off,
// so every client (the Functions host, lakeguard, Data Factory, an operator) authenticates with
// Microsoft Entra ID and is limited to its role assignments.

param name string
param location string
param tags object = {}

@description('Replication of the account.')
param skuName string = 'Standard_LRS'

@description('Hierarchical namespace (ADLS Gen2). The backup account must list names in the same order as the source (README: LAKEGUARD_NAME_ORDER), so it mirrors the source account.')
param isHnsEnabled bool = false

@description('Blob containers created with the account (the deployment package container).')
param containers array = []

@description('Queues created with the account (lakeguard\'s queues and their -poison queues).')
param queues array = []

@description('Blob name prefixes (container/prefix) of lakeguard\'s own bookkeeping records that expire; empty: no lifecycle policy. Never backup data.')
param expiringPrefixes array = []

@description('Days after its last write a bookkeeping record expires (lifecycle management).')
@minValue(2)
param expireAfterDays int = 7

@description('Put a CanNotDelete lock on the account (it blocks deleting the account and its resource group, not data).')
param lockAccount bool = false

resource account 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  name: name
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    name: skuName
  }
  properties: {
    accessTier: 'Hot'
    allowBlobPublicAccess: false
    allowSharedKeyAccess: false
    allowCrossTenantReplication: false
    defaultToOAuthAuthentication: true
    isHnsEnabled: isHnsEnabled
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      defaultAction: 'Allow'
      bypass: 'AzureServices'
    }
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: account
  name: 'default'
}

resource blobContainers 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = [
  for c in containers: {
    parent: blobService
    name: c
    properties: {
      publicAccess: 'None'
    }
  }
]

resource queueService 'Microsoft.Storage/storageAccounts/queueServices@2023-05-01' = if (!empty(queues)) {
  parent: account
  name: 'default'
}

resource accountQueues 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' = [
  for q in queues: {
    parent: queueService
    name: q
  }
]

// Only lakeguard's own small records that nothing reads once their run is over: request batch
// records (trusted for LAKEGUARD_PENDING_TTL_SECS at most) and producer run records (read by the
// continuation hops of one run). Watermarks, coverage records, restore documents and every backup
// blob are outside these prefixes and are never touched by a rule.
resource lifecycle 'Microsoft.Storage/storageAccounts/managementPolicies@2023-05-01' = if (!empty(expiringPrefixes)) {
  parent: account
  name: 'default'
  properties: {
    policy: {
      rules: [
        {
          name: 'lakeguard-expire-bookkeeping'
          enabled: true
          type: 'Lifecycle'
          definition: {
            filters: {
              blobTypes: [
                'blockBlob'
              ]
              prefixMatch: expiringPrefixes
            }
            actions: {
              baseBlob: {
                delete: {
                  daysAfterModificationGreaterThan: expireAfterDays
                }
              }
              snapshot: {
                delete: {
                  daysAfterCreationGreaterThan: expireAfterDays
                }
              }
            }
          }
        }
      ]
    }
  }
}

resource lock 'Microsoft.Authorization/locks@2020-05-01' = if (lockAccount) {
  scope: account
  name: '${name}-no-delete'
  properties: {
    level: 'CanNotDelete'
    notes: 'lakeguard: this account holds the backups. Remove this lock deliberately before deleting the account or its resource group.'
  }
}

output name string = account.name
output id string = account.id
output blobEndpoint string = account.properties.primaryEndpoints.blob
output queueEndpoint string = account.properties.primaryEndpoints.queue
output tableEndpoint string = account.properties.primaryEndpoints.table
