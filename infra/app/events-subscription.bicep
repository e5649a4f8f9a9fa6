// The subscription that feeds EventBackup: blob creations, deletions and ADLS Gen2 renames of
// the covered containers go to the event queue, in the Event Grid schema, delivered with the
// system topic's identity (no keys, no SAS).

param topicName string
param jobsAccountId string
param queueName string

@description('Containers whose events are delivered (empty: every container).')
param containers array = []

resource topic 'Microsoft.EventGrid/systemTopics@2024-06-01-preview' existing = {
  name: topicName
}

resource subscription 'Microsoft.EventGrid/systemTopics/eventSubscriptions@2024-06-01-preview' = {
  parent: topic
  name: 'lakeguard-backup'
  properties: {
    eventDeliverySchema: 'EventGridSchema'
    deliveryWithResourceIdentity: {
      identity: {
        type: 'SystemAssigned'
      }
      destination: {
        endpointType: 'StorageQueue'
        properties: {
          resourceId: jobsAccountId
          queueName: queueName
          // Kept until EventBackup takes them (-1: never expire).
          queueMessageTimeToLiveInSeconds: -1
        }
      }
    }
    filter: {
      includedEventTypes: [
        'Microsoft.Storage.BlobCreated'
        'Microsoft.Storage.BlobDeleted'
        'Microsoft.Storage.BlobRenamed'
        'Microsoft.Storage.DirectoryRenamed'
        'Microsoft.Storage.DirectoryDeleted'
      ]
      subjectBeginsWith: '/blobServices/default/containers/'
      advancedFilters: empty(containers)
        ? []
        : [
            {
              operatorType: 'StringBeginsWith'
              key: 'subject'
              values: [for c in containers: '/blobServices/default/containers/${c}/blobs/']
            }
          ]
    }
    retryPolicy: {
      maxDeliveryAttempts: 30
      eventTimeToLiveInMinutes: 1440
    }
  }
}
